"""What the ``hope-hf`` commands share: the usage error, logging, device choice, loading a saved model and its
tokenizer with errors that name the option, and generating text from it.

Imported by the command modules (``hope_hf._cli_*``) and ``hope_hf.evaluation.cli``; it imports none of them, so the
command modules do not import each other in a circle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = [
    "CliError",
    "CliFailure",
    "describe_exception",
    "check_model_folder",
    "check_output_dir_is_a_folder",
    "check_tokenizer_folder",
    "for_option",
    "generate_text",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "log",
    "resolve_device",
    "same_or_nested",
    "wants_suite",
]


class CliError(ValueError):
    """A usage error: the message names the option and what it accepts (exit status 2)."""

    exit_code = 2


class CliFailure(CliError):
    """A failure that is not a usage error: a file named by the message cannot be used (damaged, not finite, not
    matching its config) or the work itself failed (exit status 1)."""

    exit_code = 1


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else ""
    return line or type(err).__name__


def _one_line(err: BaseException, most: int = 300) -> str:
    """The whole message of ``err`` on one line (its lines joined), cut at ``most`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= most else text[: most - 3] + "..."


# local variable names under which loaders hold the file they read (torch.load's `f`, Transformers' loaders, ...)
_FILE_LOCALS = ("f", "file", "filename", "path", "checkpoint_file", "resolved_archive_file", "weights_file",
                "safe_weights_file", "rng_file", "config_file", "json_file", "tokenizer_file", "vocab_file",
                "data_file", "fp")


def _file_being_read(err: BaseException) -> str | None:
    """The file that was being read where ``err`` was raised, found in the frames of its traceback (innermost
    first), or None."""
    tb, frames = err.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in _FILE_LOCALS:
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
                return os.fspath(value)
            value = getattr(value, "name", None)  # an open file object
            if isinstance(value, str) and os.path.isfile(value):
                return value
    return None


def describe_exception(err: BaseException) -> str:
    """One line for an unexpected error: the file being read when it happened (if any), the error's type and the
    first line of its message."""
    cause = err.__cause__ or err.__context__
    where = _file_being_read(err) or (_file_being_read(cause) if cause is not None else None)
    return (f"{where}: " if where else "") + f"{type(err).__name__}: {_first_line(err)}"


def log(msg: str) -> None:
    """Print ``msg`` on the main process only (``RANK`` 0 under a multi-process launcher)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, flush=True)


def for_option(option: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its `DataError` a CLI error that names ``option``."""
    from .data import DataError

    try:
        return fn(*args, **kwargs)
    except DataError as err:
        raise CliError(f"{option}: {err}") from err


def resolve_device(name: str):
    """The `torch.device` of a ``--device`` value ('auto', 'cpu' or 'cuda[:N]'), checked against this machine."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CliError(f"--device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name!r}: no CUDA device is available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise CliError(f"--device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    return device


def same_or_nested(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` are the same folder or one lies inside the other."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra == rb or ra in rb.parents or rb in ra.parents


def check_output_dir_is_a_folder(path: str, option: str = "--output_dir") -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"{option} {path!r} is an existing file, not a folder; choose a folder")


def check_model_folder(path: str, option: str = "--model_name_or_path") -> None:
    """A saved HOPE model folder (checked from its config, without loading the weights)."""
    from transformers import AutoConfig

    from hope_hf import HopeConfig  # importing hope_hf registers the HOPE auto classes

    if not os.path.isdir(path):
        raise CliError(f"{option} {path!r} is not a folder (a model saved with save_pretrained)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CliError(f"{option} {path!r} has no config.json: not a saved model folder")
    try:
        saved_type = json.loads(Path(path, "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise CliFailure(f"{option} {path!r}: config.json is not a valid JSON object ({_first_line(err)})") from err
    if saved_type not in (None, HopeConfig.model_type):
        raise CliError(
            f"{option} {path!r} holds a {saved_type!r} model, not a HOPE model "
            f"({HopeConfig.model_type!r}); convert Llama models with `hope-hf convert`"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # a wrong type or value of a field: the config's own error names the field
        raise CliFailure(f"{option} {path!r}: config.json is not a valid HOPE config: {_one_line(err)}") from err
    if config.model_type != HopeConfig.model_type:
        raise CliError(
            f"{option} {path!r} holds a {config.model_type!r} model, not a HOPE model "
            f"({HopeConfig.model_type!r}); convert Llama models with `hope-hf convert`"
        )


def check_tokenizer_folder(path: str, option: str) -> None:
    if not os.path.isdir(path) or not any(
        os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        raise CliError(f"{option} {path!r} holds no tokenizer (tokenizer.json / tokenizer_config.json)")


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _weights_file(path: str) -> str:
    """The name of the weights file of a saved model folder (the first that exists), for messages."""
    return next((name for name in _WEIGHT_FILES if os.path.exists(os.path.join(path, name))), "model.safetensors")


def _list_names(names, most: int = 3) -> str:
    names = sorted(str(n) for n in names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def load_model(path: str, device=None, option: str = "--model_name_or_path"):
    """The saved HOPE model of ``path``, refused with one line naming the file when its config or weights cannot be
    loaded, when a weight is missing, unexpected or of another shape than the config says, or when a weight is not
    finite (a model whose outputs would be NaN)."""
    import torch
    from transformers.utils import logging as hf_logging

    from hope_hf import HopeForCausalLM  # importing hope_hf registers the HOPE auto classes

    check_model_folder(path, option)
    weights = _weights_file(path)
    if not any(os.path.exists(os.path.join(path, name)) for name in _WEIGHT_FILES):
        raise CliError(f"{option} {path!r} holds no weights ({' / '.join(_WEIGHT_FILES[:3])})")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report is replaced by the error below
    try:
        model, info = HopeForCausalLM.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as err:  # a damaged, truncated or crafted weights file
        where = _file_being_read(err)
        name = os.path.basename(where) if where else weights
        raise CliFailure(f"{option} {path!r}: {name} cannot be loaded ({type(err).__name__}: {_first_line(err)}); "
                         "it is damaged or not a weights file: save or download the model again") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {_list_names(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"not in this model: {_list_names(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        shown = [f"{name} {tuple(saved)} in the file, {tuple(built)} for config.json"
                 for name, saved, built in sorted(info["mismatched_keys"])[:2]]
        more = len(info["mismatched_keys"]) - len(shown)
        problems.append("of another shape: " + "; ".join(shown) + (f" and {more} more" if more > 0 else ""))
    if problems:
        raise CliFailure(f"{option} {path!r}: the weights in {weights} do not match its config.json ("
                         + "; ".join(problems) + "); save the model again, or fix config.json")
    not_finite = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if not_finite:
        raise CliFailure(f"{option} {path!r}: {weights} holds weights that are not finite (NaN or inf): "
                         f"{_list_names(not_finite)}; the model's outputs would be NaN (a diverged training run?)")
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(path: str, option: str):
    from transformers import AutoTokenizer

    check_tokenizer_folder(path, option)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # a truncated or damaged tokenizer.json, a config naming an unknown class, ...
        where = _file_being_read(err)
        name = os.path.basename(where) if where else next(
            f for f in ("tokenizer.json", "tokenizer_config.json") if os.path.exists(os.path.join(path, f)))
        raise CliFailure(f"{option} {path!r}: the tokenizer cannot be loaded from {name} ({type(err).__name__}: "
                         f"{_first_line(err)}); it is damaged: save or download it again") from err


def load_model_and_tokenizer(model_name_or_path: str, tokenizer_name_or_path: str | None, device: str):
    """The saved model on ``--device``, and its tokenizer (``--tokenizer_name_or_path``, else the model folder's),
    checked to match it."""
    from .tokenizer import check_tokenizer_matches

    model = load_model(model_name_or_path, resolve_device(device))
    tokenizer = load_tokenizer(tokenizer_name_or_path or model_name_or_path,
                               "--tokenizer_name_or_path" if tokenizer_name_or_path else "--model_name_or_path")
    check_tokenizer_matches(tokenizer, model.config)
    return model, tokenizer


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, **gen_kwargs) -> str:
    """The text `model` generates from `prompt` (the prompt included), in eval mode, the mode restored after."""
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


def wants_suite(argv: list[str]) -> bool:
    """True when the ``eval`` arguments ask for the long-context suite (``--task``)."""
    return any(a == "--task" or a.startswith("--task=") for a in argv)

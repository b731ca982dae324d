"""What the ``hope-hf`` commands share: the usage error, logging, device choice, and loading a saved model and its
tokenizer with errors that name the option.

Imported by ``hope_hf.cli`` and ``hope_hf.evaluation.cli``; it imports neither, so the two command modules do not
import each other in a circle.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CliError",
    "check_model_folder",
    "check_output_dir_is_a_folder",
    "check_tokenizer_folder",
    "for_option",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "log",
    "resolve_device",
    "same_or_nested",
]


class CliError(ValueError):
    """A usage error: the message names the option and what it accepts."""


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
    config = AutoConfig.from_pretrained(path)
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


def load_model(path: str, device=None):
    from hope_hf import HopeForCausalLM  # importing hope_hf registers the HOPE auto classes

    check_model_folder(path)
    model = HopeForCausalLM.from_pretrained(path)
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(path: str, option: str):
    from transformers import AutoTokenizer

    check_tokenizer_folder(path, option)
    return AutoTokenizer.from_pretrained(path)


def load_model_and_tokenizer(model_name_or_path: str, tokenizer_name_or_path: str | None, device: str):
    """The saved model on ``--device``, and its tokenizer (``--tokenizer_name_or_path``, else the model folder's),
    checked to match it."""
    from .tokenizer import check_tokenizer_matches

    model = load_model(model_name_or_path, resolve_device(device))
    tokenizer = load_tokenizer(tokenizer_name_or_path or model_name_or_path,
                               "--tokenizer_name_or_path" if tokenizer_name_or_path else "--model_name_or_path")
    check_tokenizer_matches(tokenizer, model.config)
    return model, tokenizer

"""hope-hf: HOPE (Nested Learning, Behrouz et al., NeurIPS 2025) as a native Hugging Face Transformers model.

Importing the package registers the model type "nested_hope" with `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM`, so `AutoModelForCausalLM.from_pretrained(<saved HOPE folder>)` works without remote code.

The one exception is the `hope-hf` command itself (its console script, or `python -m hope_hf.cli`): there the model
code (and torch) is imported when a command runs, or when a name below is first used, so that `hope-hf --help`
answers at once.
"""

import os
import sys


__version__ = "0.1.0"

__all__ = ["HopeConfig", "HopeConfigError", "HopeForCausalLM", "HopeModel", "HopePreTrainedModel", "__version__"]


def _import_model_code() -> None:
    """Import the model classes into the package and register them for the Auto classes (again: a no-op)."""
    global HopeConfig, HopeConfigError, HopeForCausalLM, HopeModel, HopePreTrainedModel
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_hope import HopeConfig, HopeConfigError
    from .modeling_hope import HopeForCausalLM, HopeModel, HopePreTrainedModel

    AutoConfig.register(HopeConfig.model_type, HopeConfig, exist_ok=True)
    AutoModel.register(HopeConfig, HopeModel, exist_ok=True)
    AutoModelForCausalLM.register(HopeConfig, HopeForCausalLM, exist_ok=True)
    # Saved folders carry the flat model files and an `auto_map`, so they also load with `trust_remote_code=True`
    # where hope-hf is not installed (docs/design.md §1, §13).
    HopeConfig.register_for_auto_class()
    HopeModel.register_for_auto_class("AutoModel")
    HopeForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def _started_as_cli() -> bool:
    """Whether this process is the `hope-hf` command: its console script, or `python [options] -m hope_hf.cli`."""
    if os.path.basename(sys.argv[0]).split(".")[0] == "hope-hf":
        return True
    argv = list(getattr(sys, "orig_argv", ()))
    return any(flag == "-m" and module == "hope_hf.cli" for flag, module in zip(argv, argv[1:]))


def __getattr__(name: str):
    if name in __all__:  # the model names, before a command of the `hope-hf` process imported them
        _import_model_code()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not _started_as_cli():
    _import_model_code()

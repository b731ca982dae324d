"""`TrainingArguments` of the `hope-hf train` command (a module of its own so that pickled arguments in checkpoints
refer to an importable class, also when the CLI runs as `python -m hope_hf.cli`)."""

from dataclasses import dataclass

from transformers import TrainingArguments

from .._cli_arguments import TrainingDefaults

__all__ = ["HopeTrainingArguments"]


@dataclass
class HopeTrainingArguments(TrainingDefaults, TrainingArguments):
    """`TrainingArguments` with the defaults of `hope_hf._cli_arguments.TrainingDefaults` (sized for the tiny preset
    on CPU: a few minutes); every option in Transformers' order."""

    _argument_group_name = "training (every TrainingArguments option, with the defaults of hope-hf train)"

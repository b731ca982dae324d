"""`TrainingArguments` of the `hope-hf train` command (a module of its own so that pickled arguments in checkpoints
refer to an importable class, also when the CLI runs as `python -m hope_hf.cli`)."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

__all__ = ["HopeTrainingArguments"]


@dataclass
class HopeTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults sized for the tiny preset on CPU (a few minutes)."""

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

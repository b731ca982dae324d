"""``hope-hf train``: check every input, then tokenizer, model, data, the Trainer run, the saved model and the report.
"""

from __future__ import annotations

import json
import math
import os
import time

from ._cli_arguments import DataArguments, ModelArguments, RunArguments, parse_arguments
from ._cli_common import (
    CliError,
    CliFailure,
    _file_being_read,
    check_model_folder,
    check_output_dir_is_a_folder,
    check_tokenizer_folder,
    describe_exception,
    for_option,
    generate_text,
    load_model,
    load_tokenizer,
    log,
    same_or_nested,
)
from ._cli_output import (
    _check_checkpoint_matches,
    _check_inputs_outside,
    _clear_folder,
    _foreign_files,
    _record_run_files,
    checkpoint_problem,
    prepare_output_dir,
)

__all__ = ["cmd_train"]


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
    from .training.arguments import HopeTrainingArguments

    model_args, data_args, run_args, args = parse_arguments(
        "train", (ModelArguments, DataArguments, RunArguments, HopeTrainingArguments), argv)
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
    resume, clear_output_dir = prepare_output_dir(args.output_dir, run_args.overwrite_output_dir, resume)
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


def _barrier(args) -> None:
    if args.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


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
    _print_readable_logs(trainer)
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


# the time and speed of the run so far, which Trainer adds to every log line while it counts the tokens seen: printed
# once, in the summary that ends training
_RUN_SPEED = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_tokens_per_second")


def format_log(logs: dict) -> str:
    """One Trainer log line as printed: numbers as numbers (floats to 4 significant digits), without `total_flos`,
    and the run's time and speed only in the summary at the end of training (the line with `train_loss`)."""
    summary = "train_loss" in logs
    return str({name: float(f"{value:.4g}") if isinstance(value, float) else value for name, value in logs.items()
                if name != "total_flos" and (summary or name not in _RUN_SPEED)})


def _print_readable_logs(trainer) -> None:
    """Replace the Trainer's log printer (the progress bar's, or the plain one under --disable_tqdm) with one that
    prints `format_log` lines."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class ProgressLogs(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None:
                self.training_bar.write(format_log(logs))

    class PrintedLogs(PrinterCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_local_process_zero and logs is not None:
                print(format_log(logs))

    for default, readable in ((ProgressCallback, ProgressLogs), (PrinterCallback, PrintedLogs)):
        if trainer.pop_callback(default) is not None:
            trainer.add_callback(readable)


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


def _sample_generation(model, tokenizer, run_args, seed: int) -> str | None:
    """The sample printed after training (--sample_*), None with --sample_max_new_tokens 0."""
    import torch

    if run_args.sample_max_new_tokens <= 0:
        return None
    gen = {"do_sample": False}
    if run_args.sample_temperature > 0:
        torch.manual_seed(seed)
        gen = {"do_sample": True, "temperature": run_args.sample_temperature, "top_k": 50}
    return generate_text(model, tokenizer, run_args.sample_prompt, run_args.sample_max_new_tokens, **gen)


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

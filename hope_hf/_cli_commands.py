"""``hope-hf eval``, ``hope-hf generate`` and ``hope-hf convert`` (``hope-hf train``: ``hope_hf._cli_train``)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from ._cli_arguments import ConvertArguments, EvalArguments, GenerateArguments, _parse_extra_levels, parse_arguments
from ._cli_common import (
    CliError,
    check_output_dir_is_a_folder,
    for_option,
    generate_text,
    load_model_and_tokenizer,
    log,
    same_or_nested,
)
from ._cli_output import check_output_file

__all__ = ["cmd_convert", "cmd_eval", "cmd_generate"]


def cmd_eval(argv: list[str]) -> dict:
    from .evaluation.cli import cmd_eval_suite, wants_suite

    if wants_suite(argv):  # the long-context suite (hope_hf.evaluation): `hope-hf eval --task passkey --help`
        return cmd_eval_suite(argv)
    from .data import check_seq_len
    from .evaluation.perplexity import evaluate_perplexity
    from .threads import FreeCoreThreads

    (a,) = parse_arguments("eval", (EvalArguments,), argv)
    if a.output_file:
        check_output_file(a.output_file, a.overwrite_output_file)
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


def cmd_generate(argv: list[str]) -> str:
    import torch
    from transformers import TextStreamer

    (a,) = parse_arguments("generate", (GenerateArguments,), argv)
    model, tokenizer = load_model_and_tokenizer(a.model_name_or_path, a.tokenizer_name_or_path, a.device)
    torch.manual_seed(a.seed)
    kwargs = {"do_sample": a.do_sample, "num_beams": a.num_beams}
    if a.do_sample:
        kwargs.update(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    if a.num_beams == 1:  # stream the tokens as they come (a live progress display)
        kwargs["streamer"] = TextStreamer(tokenizer, skip_special_tokens=True)
    text = generate_text(model, tokenizer, a.prompt, a.max_new_tokens, **kwargs)
    if a.num_beams > 1:
        print(text)
    return text


def cmd_convert(argv: list[str]) -> str:
    (a,) = parse_arguments("convert", (ConvertArguments,), argv)
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

"""Smallest end-to-end run: build an untrained HOPE model from a preset and generate with it.

    python -m hope_hf.demo                      # tiny preset, random weights, seeded sampling
    python -m hope_hf.demo --preset small --max-new-tokens 32 --prompt "Nested learning" --greedy

The weights are random (nothing is trained or downloaded), so the generated text is noise: the demo shows that the
whole path (config -> model -> byte-level tokenizer -> `generate` through the recurrent `HopeCache`) runs, and how
fast. For a model that has learned something, train one with `hope-hf train --output_dir hope-tiny`. Text goes
through a byte-level tokenizer (`ByT5Tokenizer`, no files).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import ByT5Tokenizer

from . import HopeForCausalLM
from .presets import available_presets, count_parameters, get_preset

RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS (untrained model): the generated text is noise"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hope_hf.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=available_presets())
    parser.add_argument("--prompt", default="Nested learning says: ")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of seeded sampling")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")

    torch.manual_seed(args.seed)
    tokenizer = ByT5Tokenizer()
    config = get_preset(
        args.preset,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    start = time.perf_counter()
    model = HopeForCausalLM(config).eval()
    built = time.perf_counter() - start
    print(f"preset {args.preset}: {count_parameters(config):,} parameters, layers {config.layer_types}, "
          f"CMS periods {config.cms_periods}, chunk {config.chunk_size} (built in {built:.2f}s)")
    print(RANDOM_WEIGHTS_NOTE)

    inputs = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False)
    start = time.perf_counter()
    with torch.no_grad():
        # the recurrent cache (HopeCache) carries the memories' state, so each new token costs one token's step
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            do_sample=not args.greedy,
            **({} if args.greedy else {"top_k": 0}),  # sample from the whole distribution
            pad_token_id=tokenizer.pad_token_id,
        )
    elapsed = time.perf_counter() - start
    new_ids = output[0, inputs["input_ids"].shape[1]:]
    print(f"prompt   : {args.prompt!r}")
    print(f"generated: {new_ids.tolist()}")
    print(f"as text  : {tokenizer.decode(new_ids, skip_special_tokens=True)!r}")
    print(f"{len(new_ids)} tokens in {elapsed:.2f}s ({'greedy' if args.greedy else f'sampled, seed {args.seed}'})")
    print("To train a model that learns something: hope-hf train --output_dir hope-tiny")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Smallest end-to-end run: build a HOPE model from a preset and generate.

    python -m hope_hf.demo                      # tiny preset, random weights, greedy decoding
    python -m hope_hf.demo --preset small --max-new-tokens 32 --prompt "Nested learning"

The weights are random, so the text is noise; the point is that the whole path (config -> model -> tokenizer ->
generate) runs on a laptop CPU in seconds. Text goes through a byte-level tokenizer (`ByT5Tokenizer`, no files).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import ByT5Tokenizer

from . import HopeForCausalLM
from .presets import available_presets, count_parameters, get_preset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hope_hf.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=available_presets())
    parser.add_argument("--prompt", default="Nested learning says: ")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

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

    inputs = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False)
    start = time.perf_counter()
    with torch.no_grad():
        # use_cache=False: each step recomputes the sequence; the recurrent cache (HopeCache) is optional speed-up
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            do_sample=False,
            use_cache=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    elapsed = time.perf_counter() - start
    new_ids = output[0, inputs["input_ids"].shape[1]:]
    print(f"prompt   : {args.prompt!r}")
    print(f"generated: {new_ids.tolist()}")
    print(f"as text  : {tokenizer.decode(new_ids, skip_special_tokens=True)!r}")
    print(f"{len(new_ids)} tokens in {elapsed:.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Stability of the self-modifying memories over a very long stream (default: 1M tokens), DESIGN §2.2.

The tiny preset with every learning rate saturated at eta_max (= 1 by default) reads three token streams at once,
one per batch row: i.i.d. tokens, a cycle of 37 tokens, and one constant token. The stream goes through the
recurrent cache in pieces; at every power of two it prints whether everything is finite and the norms of the fast
weights of every layer relative to their meta-learned initial values (min and max over layers, heads and rows),
and how far they moved from them. A healthy memory stays finite, bounded (ratio well below 2) and alive (it keeps
moving, and the ratio stays well above 0).

    python benchmarks/memory_stability.py                    # 1M tokens
    python benchmarks/memory_stability.py --tokens 65536     # what the test suite checks, for one layer
    python benchmarks/memory_stability.py --tokens 65536 --eta-max 0.1 --overrides '{"dgd": false}'   # an ablation
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _report import check_sizes, save_report


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1 << 20, help="stream length per row")
    parser.add_argument("--piece", type=int, default=4096, help="tokens fed per forward")
    parser.add_argument("--eta-max", type=float, default=1.0, help="eta_max; every gate is saturated at it")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", default="benchmarks/results/memory_stability.json", help="where to write results")
    parser.add_argument("--overrides", default="{}",
                        help='JSON of other config fields for the tiny preset, e.g. \'{"dgd": false}\' or '
                             '\'{"retention": false}\' (the ablations DESIGN §2.2 asks to document)')
    parser.add_argument("--quick", action="store_true", help="4096 tokens: a smoke run")
    args = parser.parse_args(argv)
    try:
        overrides = json.loads(args.overrides)
    except json.JSONDecodeError as err:
        parser.error(f"--overrides is not JSON: {err}")
    if not isinstance(overrides, dict) or "eta_max" in overrides:
        parser.error("--overrides must be a JSON object of config fields other than eta_max (use --eta-max)")
    check_sizes(parser, args, positive=("tokens", "piece", "threads"))
    if not 0 < args.eta_max <= 1:
        parser.error(f"--eta-max must be in (0, 1], got {args.eta_max}")
    if args.quick:
        args.tokens, args.piece = 4096, 1024
    if args.threads:
        torch.set_num_threads(args.threads)

    from hope_hf import HopeForCausalLM
    from hope_hf.cache_hope import HopeCache
    from hope_hf.presets import get_preset

    try:
        cfg = get_preset("tiny", eta_max=args.eta_max, **overrides)
    except ValueError as err:
        parser.error(f"--overrides: {err}")
    torch.manual_seed(0)
    model = HopeForCausalLM(cfg).eval()
    layers = [layer.titans for layer in model.model.layers if hasattr(layer, "titans")]
    for titans in layers:
        titans.fast_init.eta_bias.fill_(30.0)  # sigmoid(30) = 1: every step at eta_max
    names = ["iid", "cyclic", "constant"]
    gen = torch.Generator().manual_seed(1)
    cache = HopeCache(cfg)
    rows, next_report, start = [], 1024, time.perf_counter()
    for lo in range(0, args.tokens, args.piece):
        n = min(args.piece, args.tokens - lo)
        pos = torch.arange(lo, lo + n)
        ids = torch.stack([torch.randint(0, cfg.vocab_size, (n,), generator=gen), pos % 37, torch.zeros(n, dtype=torch.long)])
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        seen = lo + n
        if seen >= next_report or seen == args.tokens:
            while next_report <= seen:
                next_report *= 2
            row = {"tokens": seen, "seconds": time.perf_counter() - start, "logits_finite": bool(torch.isfinite(out.logits).all())}
            for key, init_name in (("in", "init_in"), ("out", "init_out")):
                ratios, moved = [], []
                for idx, titans in enumerate(model.model.layers):
                    if not hasattr(titans, "titans"):
                        continue
                    init = getattr(titans.titans.fast_init, init_name)
                    cur = getattr(cache.layers[idx].state, f"current_{key}")
                    ratios.append(cur.flatten(2).norm(dim=-1) / init.flatten(1).norm(dim=-1))
                    moved.append((cur - init).flatten(2).norm(dim=-1) / init.flatten(1).norm(dim=-1))
                ratios, moved = torch.stack(ratios), torch.stack(moved)  # (layers, rows, heads)
                row[f"w_{key}_finite"] = bool(torch.isfinite(ratios).all())
                for r, name in enumerate(names):
                    row[f"{name}_w_{key}_norm_ratio_min"] = ratios[:, r].min().item()
                    row[f"{name}_w_{key}_norm_ratio_max"] = ratios[:, r].max().item()
                    row[f"{name}_w_{key}_moved"] = moved[:, r].mean().item()
            rows.append(row)
            parts = [f"{seen:>8} tok {row['seconds']:7.1f}s finite={row['logits_finite'] and row['w_in_finite'] and row['w_out_finite']}"]
            for name in names:
                parts.append(
                    f"{name}: |W2|/|W2_0| {row[f'{name}_w_in_norm_ratio_min']:.2f}-{row[f'{name}_w_in_norm_ratio_max']:.2f} "
                    f"|W1|/|W1_0| {row[f'{name}_w_out_norm_ratio_min']:.2f}-{row[f'{name}_w_out_norm_ratio_max']:.2f} "
                    f"moved {row[f'{name}_w_in_moved']:.2f}/{row[f'{name}_w_out_moved']:.2f}"
                )
            print(" | ".join(parts), flush=True)
    return save_report(args, rows=rows)


if __name__ == "__main__":
    main()
